# The same parameter-wise settings as the detection configs (one definition;
# see that file for the rules): `transnext_no_decay` for UperNet,
# `transnext_backbone_lr_01` for Mask2Former.
_base_ = '../../detection/_base_/transnext_paramwise.py'
