"""Training: learn a prompt set's prompts (and head) on labelled images, the backbone frozen.

`data` reads the dataset layouts `dicomnode train` accepts into labelled images with their
splits, and serves them to torch exactly as the node prepares images when it serves.
"""
