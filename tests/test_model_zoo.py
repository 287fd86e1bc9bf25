"""metafile.yml and docs/model_zoo.md: every config exists and builds, with the
parameter count the zoo states, and the two documents agree."""
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
META = yaml.safe_load((REPO / 'metafile.yml').read_text())
ZOO = (REPO / 'docs' / 'model_zoo.md').read_text()
MODELS = {model['Name']: model for model in META['Models']}


def test_metafile_layout_and_coverage():
    collections = {c['Name'] for c in META['Collections']}
    for model in META['Models']:
        assert {'Name', 'In Collection', 'Config', 'Metadata', 'Results', 'Weights'} <= set(model)
        assert model['In Collection'] in collections, model['Name']
        assert Path(model['Config']).stem == model['Name']
        assert model['Weights'].startswith('https://huggingface.co/DaiShiResearch/')
        assert model['Metadata']['Re-measured'] is False
        for result in model['Results']:
            assert result['Dataset'] in ('COCO', 'ADE20K') and result['Metrics']
    shipped = {str(p.relative_to(REPO)) for folder in ('detection', 'segmentation')
               for p in (REPO / 'configs' / folder).glob('*.py')}
    assert {m['Config'] for m in META['Models']} == shipped
    for collection in META['Collections']:
        assert (REPO / collection['README']).is_file()


@pytest.mark.parametrize('name', sorted(MODELS))
def test_zoo_config_builds_with_the_stated_parameters(name):
    from mmtransnext.tools.common import build_model, load_config
    model = MODELS[name]
    path = REPO / model['Config']
    assert path.is_file()
    built = build_model(load_config(str(path)))
    params = sum(p.numel() for p in built.parameters())
    # The zoo gives millions with two decimals.
    assert abs(params - model['Metadata']['Parameters']) <= 5e3, params


@pytest.mark.parametrize('name', sorted(MODELS))
def test_model_zoo_page_matches_the_metafile(name):
    model = MODELS[name]
    rows = [line for line in ZOO.splitlines() if line.startswith(f'| [{name}]')]
    assert len(rows) == 1, name
    row = rows[0]
    assert f"(../{model['Config']})" in row
    assert f"({model['Weights']})" in row
    assert f"{model['Metadata']['Parameters'] / 1e6:.2f}M" in row
    for result in model['Results']:
        for value in result['Metrics'].values():
            text = '-'.join(str(v) for v in value) if isinstance(value, list) else str(value)
            assert f'| {text}' in row, (text, row)
    converted = re.escape(f"checkpoints/{re.sub(r'_ms-flip.*$', '', name)}.pth")
    assert re.search(rf"tools/dist_test.sh {re.escape(model['Config'])} {converted} 8", ZOO)
    assert re.search(rf'tools/convert_checkpoint.py checkpoints/'
                     rf"{re.escape(model['Weights'].rsplit('/', 1)[1])} {converted}", ZOO)
