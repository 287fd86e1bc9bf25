# Mask R-CNN 1x with TransNeXt-Tiny on a COCO-format instance dataset of your own
# (docs/custom_dataset.md). Expected layout, relative to where you run the tools:
#   data/my_coco/annotations/instances_train.json   COCO instances JSON
#   data/my_coco/annotations/instances_val.json
#   data/my_coco/train/   images named as the JSON's file_name entries
#   data/my_coco/val/
# Everything else (the model, the 1x schedule, AdamW with the TransNeXt weight-decay
# exemptions) comes from the published COCO config.
_base_ = '../detection/mask-rcnn_transnext-tiny_fpn_1x_coco.py'

# ---------------------------------------------------------------- classes
# The category names of your JSON files, in the order of their `categories` list
# (labels 0, 1, 2... follow that order); the palette colours the pictures of
# tools/test.py --show-dir.
classes = ('circle', 'square', 'triangle')
metainfo = dict(
    classes=classes,
    palette=[(220, 20, 60), (0, 120, 255), (255, 180, 0)])

# ---------------------------------------------------------------- data
data_root = 'data/my_coco/'
train_dataloader = dict(
    batch_size=2,  # per GPU
    num_workers=2,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/')))
val_dataloader = dict(
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/')))
test_dataloader = val_dataloader
# The evaluator reads the ground truth itself: point it at the same JSON.
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

# ---------------------------------------------------------------- model
model = dict(
    backbone=dict(
        # The position bias is built for this input size and resized to
        # others: the short side the pipeline resizes to (800 of mmdet's
        # (1333, 800)). It creates no parameters, so any checkpoint loads.
        img_size=800),
    roi_head=dict(
        # Every head that classifies: the box head and the mask head.
        bbox_head=dict(num_classes=len(classes)),
        mask_head=dict(num_classes=len(classes))))

# ---------------------------------------------------------------- batch and lr
# The published lr 1e-4 is for 16 images per iteration (8 GPUs x 2). With
# another total batch, scale it linearly: `tools/train.py --auto-scale-lr` sets
# lr = 1e-4 * (GPUs x batch_size) / 16, or write the value into
# optim_wrapper.optimizer.lr yourself.
auto_scale_lr = dict(enable=False, base_batch_size=16)

# ---------------------------------------------------------------- runtime
# GPUs talk over NCCL (tools/dist_train.sh, tools/slurm_train.sh); on a machine
# without CUDA, tools/train.py and tools/test.py switch to gloo themselves.
env_cfg = dict(dist_cfg=dict(backend='nccl'))
