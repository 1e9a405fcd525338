"""What trains a model: the linear head, the fine-tune policy and recipe, transfer probes, cross-validation."""
