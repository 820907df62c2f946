"""Running the detector: training (joint, 4-step, RPN-only), checkpoints, evaluation, devices."""
