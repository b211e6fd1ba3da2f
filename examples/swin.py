"""Prune timm Swin-T at a few ratios and head ratios; the same table as examples/deit.py.

    python examples/swin.py
    python examples/swin.py --model swinv2_tiny_window8_256 --settings "0.5:0 0:0.5 0.5:0.5"
"""
from deit import main

if __name__ == "__main__":
    main(default_model="swin_tiny_patch4_window7_224", default_settings="0.3:0 0.5:0 0:0.5 0.5:0.5")
