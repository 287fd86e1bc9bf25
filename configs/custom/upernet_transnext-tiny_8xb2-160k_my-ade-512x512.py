# UperNet with TransNeXt-Tiny on an ADE20K-format semantic segmentation dataset
# of your own (docs/custom_dataset.md). Expected layout, relative to where you
# run the tools:
#   data/my_ade/images/training/*.jpg       data/my_ade/annotations/training/*.png
#   data/my_ade/images/validation/*.jpg     data/my_ade/annotations/validation/*.png
# Label maps are single-channel PNGs named as their images; as in ADE20K, value 0
# is "unlabelled" (ignored) and values 1..N are the classes below, in order.
# Everything else (the heads, the 160k schedule, AdamW with the TransNeXt
# weight-decay exemptions) comes from the published ADE20K config.
_base_ = '../segmentation/upernet_transnext-tiny_8xb2-160k_ade20k-512x512.py'

# ---------------------------------------------------------------- classes
# Pixel value k in a label map is classes[k - 1] (reduce_zero_label below).
classes = ('background', 'circle', 'square', 'triangle')
metainfo = dict(
    classes=classes,
    palette=[[80, 80, 80], [220, 20, 60], [0, 120, 255], [255, 180, 0]])

# ---------------------------------------------------------------- data
data_root = 'data/my_ade/'
_dataset = dict(
    type='BaseSegDataset',
    data_root=data_root,
    metainfo=metainfo,
    img_suffix='.jpg',
    seg_map_suffix='.png',
    # 0 -> ignored (255), k -> k - 1. With labels that start at 0 for a real
    # class, set False here and in the pipelines' LoadAnnotations.
    reduce_zero_label=True)
train_dataloader = dict(
    batch_size=2,  # per GPU
    dataset=dict(
        **_dataset,
        data_prefix=dict(
            img_path='images/training', seg_map_path='annotations/training')))
val_dataloader = dict(
    dataset=dict(
        **_dataset,
        data_prefix=dict(
            img_path='images/validation',
            seg_map_path='annotations/validation')))
test_dataloader = val_dataloader
# mIoU over the classes above (the evaluator takes them from the dataset).
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

# ---------------------------------------------------------------- model
model = dict(
    backbone=dict(
        # The position bias is built for this input size and resized to
        # others: the training crop (512 x 512 here). It creates no
        # parameters, so any checkpoint loads.
        img_size=512),
    # Both heads classify pixels.
    decode_head=dict(num_classes=len(classes)),
    auxiliary_head=dict(num_classes=len(classes)))

# ---------------------------------------------------------------- batch and lr
# The published lr 6e-5 is for 16 images per iteration (8 GPUs x 2). With
# another total batch, scale it linearly: `tools/train.py --auto-scale-lr` sets
# lr = 6e-5 * (GPUs x batch_size) / 16, or write the value into
# optim_wrapper.optimizer.lr yourself.
auto_scale_lr = dict(enable=False, base_batch_size=16)

# ---------------------------------------------------------------- runtime
# GPUs talk over NCCL (tools/dist_train.sh, tools/slurm_train.sh); on a machine
# without CUDA, tools/train.py and tools/test.py switch to gloo themselves.
env_cfg = dict(dist_cfg=dict(backend='nccl'))
