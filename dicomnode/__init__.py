"""dicomnode: a DICOM AI node that classifies studies with a frozen CLIP and learned prompts."""

__version__ = "0.1.0"
