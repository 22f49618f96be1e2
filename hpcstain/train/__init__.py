"""Training: distributed set-up, checkpoints, logs and the trainer loop."""
