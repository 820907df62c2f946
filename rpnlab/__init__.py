"""rpnlab: Faster R-CNN built step by step, centred on the Region Proposal Network."""

__version__ = "0.1.0"
