# UperNet with TransNeXt-Tiny (trained with the single-scale config), tested
# with multiple scales and flipping. Published: mIoU 51.5-51.7 (ms+flip; the
# range covers the release's interpolation and extrapolation variants).
#
# A test-only config: `model` is mmseg's SegTTAModel around the single-scale
# segmentor, which averages the class scores of every scale and flip, and the
# test loader yields every augmented copy. Run it with the checkpoint trained
# by upernet_transnext-tiny_8xb2-160k_ade20k-512x512.py (loading strips
# nothing: mmengine loads into SegTTAModel's inner module). No --tta flag is
# needed.
#
# As in the release's `_ms` configs, the position bias is built for
# img_size=800 here (512 in the single-scale config): the multi-scale inputs
# are on average much larger than 512 px, so the bias is resized less.
# img_size creates no parameters; the checkpoint is the same.
_base_ = './_base_/upernet_transnext-tiny_ade20k_img-size-800.py'

# The scales of mmseg 0.x's MultiScaleFlipAug, which the published numbers
# used: the single-scale test size (2048, 512) times each ratio, aspect kept.
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(
        type='TestTimeAug',
        transforms=[
            [
                dict(
                    type='Resize',
                    scale=(int(2048 * r), int(512 * r)),
                    keep_ratio=True) for r in img_ratios
            ],
            [
                dict(type='RandomFlip', prob=0., direction='horizontal'),
                dict(type='RandomFlip', prob=1., direction='horizontal'),
            ],
            [dict(type='LoadAnnotations', reduce_zero_label=True)],
            [dict(type='PackSegInputs')],
        ]),
]
tta_model = dict(type='SegTTAModel')
model = dict(_delete_=True, type='SegTTAModel', module={{_base_.model}})
test_dataloader = dict(dataset=dict(pipeline=tta_pipeline))
