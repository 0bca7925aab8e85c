"""Training stage: patch loader, training loop, prediction and evaluation."""
