"""Helpers shared by tests of several areas: synthetic ophthalmic DICOM, a running listener, SR checks, Orthanc
and the viewer in a browser, and the Celery stub app a worker subprocess loads (`tests.helpers.ingest_celery_stub`)."""
