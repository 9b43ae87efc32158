"""Pure-PyTorch LTE engine. Nothing under core/ imports ray."""
