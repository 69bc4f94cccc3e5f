"""Using a trained model: load it, evaluate it on a split, predict on images."""
