"""pydicom's `deid` (PyPI `deid`, the pydicom project's de-identifier) over a list of files,
the way medledger's benchmark runs itself: every file read, de-identified with deid's default
DICOM recipe and written; files it cannot read are counted and skipped. Prints JSON: files,
written, failed, seconds (files to files) and seconds_memory (parse from bytes,
de-identify, encode to bytes)."""
import io
import json
import logging
import os
import sys
import time

import pydicom
from deid.dicom import replace_identifiers

logging.disable(logging.CRITICAL)

files = [line.strip() for line in open(sys.argv[1]) if line.strip()]
out = sys.argv[2]
os.makedirs(out, exist_ok=True)
blobs = [open(f, "rb").read() for f in files]

written = failed = 0
t0 = time.perf_counter()
for i, f in enumerate(files):
    try:
        (ds,) = replace_identifiers(dicom_files=[f], save=False)
        ds.save_as(os.path.join(out, f"{i}.dcm"))
        written += 1
    except Exception:
        failed += 1
seconds = time.perf_counter() - t0

t0 = time.perf_counter()
for b in blobs:
    try:
        ds = pydicom.dcmread(io.BytesIO(b))
        (ds,) = replace_identifiers(dicom_files=[ds], save=False)
        buf = io.BytesIO()
        ds.save_as(buf)
    except Exception:
        pass
seconds_memory = time.perf_counter() - t0
print(json.dumps({"files": len(files), "written": written, "failed": failed,
                  "seconds": seconds, "seconds_memory": seconds_memory}))
