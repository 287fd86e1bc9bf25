# Parameter-wise optimizer settings shared by every TransNeXt config
# (detection and segmentation).
#
# The published results train without weight decay on the attention's query
# embedding, its local relative position bias, the continuous position bias
# MLP (cpb_fc1 / cpb_fc2), the temperature, and every LayerNorm.
#
# mmengine's DefaultOptimWrapperConstructor matches `custom_keys` as substrings
# of the full parameter name (e.g. 'backbone.block3.7.attn.cpb_fc1.weight'),
# tries the longest key first and stops at the first hit; a hit replaces, it
# does not combine with, a shorter key. So each key below is
# * longer than 'backbone' (8 characters), which DINO and Mask2Former set to
#   lr_mult=0.1: a shorter key would lose to it and its parameter would keep
#   weight decay;
# * written to hit only TransNeXt parameters (names from the released
#   checkpoints), never a detector or segmentor head's: mmdet's DINO has its
#   own `query_embedding.weight`, and DETR-style layers have `norms.N` and
#   `decoder.norm`.
# tests/test_configs.py checks both on every config, parameter by parameter.
transnext_no_decay_names = [
    'attn.query_embedding',  # (heads, 1, head_dim) per attention layer
    'attn.relative_pos_bias_local',  # (heads, window*window)
    'attn.cpb_fc',  # cpb_fc1 and cpb_fc2, weights and biases
    'attn.temperature',  # (heads, 1, 1)
    'attn.norm.',  # LayerNorm of the pooled tokens
    '.norm1.weight',  # block norm1, and the stage-1 output norm backbone.norm1
    '.norm1.bias',
    '.norm2.weight',  # block norm2, and the stage-2 output norm backbone.norm2
    '.norm2.bias',
    'backbone.norm3.',  # stage output norms
    'backbone.norm4.',
    'backbone.patch_embed1.norm.',  # patch-embedding norms
    'backbone.patch_embed2.norm.',
    'backbone.patch_embed3.norm.',
    'backbone.patch_embed4.norm.',
]

# Whole model at the base learning rate (Mask R-CNN, UperNet).
transnext_no_decay = {
    name: dict(decay_mult=0.)
    for name in transnext_no_decay_names
}

# Backbone at 0.1 x the base learning rate (DINO, Mask2Former). The no-decay
# keys repeat lr_mult=0.1 because they win over 'backbone' instead of adding
# to it.
transnext_backbone_lr_01 = {
    name: dict(lr_mult=0.1, decay_mult=0.)
    for name in transnext_no_decay_names
}
transnext_backbone_lr_01['backbone'] = dict(lr_mult=0.1, decay_mult=1.)
