"""Training: a DeepSpeed worker launched once per rank, and the stage that launches it and commits the model."""
