"""Development tools: the demo, synthetic DICOM builders and loopback port helpers. Not shipped in the runtime wheel."""
