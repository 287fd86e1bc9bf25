# The segmentor the ms+flip test configs wrap: the single-scale UperNet with
# TransNeXt-Tiny, its position bias built for 800 px inputs instead of 512, as in
# the release's `_ms` configs (the multi-scale inputs, 0.5-1.75 of 2048x512, are
# on average much larger than 512 px). img_size creates no parameters, so the
# single-scale checkpoint loads unchanged. Not meant for training: it exists
# because a config that wraps its base's model in SegTTAModel cannot also
# change one key of it.
_base_ = '../upernet_transnext-tiny_8xb2-160k_ade20k-512x512.py'

model = dict(backbone=dict(img_size=800))
