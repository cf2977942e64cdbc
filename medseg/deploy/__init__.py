"""Deployment: the DICOM node for a PACS."""
