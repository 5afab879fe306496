"""A pydicom-based de-identifier from PyPI over a list of files, the way medledger's
benchmark runs itself: every file read, de-identified and written; files the tool cannot
read are counted and skipped. TOOL is `dicognito` (0.19, its defaults) or `deid` (pydicom's
deid, its default DICOM recipe). Prints JSON: files, written, failed, seconds (files to
files) and seconds_memory (parse from bytes, de-identify, encode to bytes).

Usage: bench_deid_python.py TOOL FILE_LIST OUT_DIR"""
import io
import json
import logging
import os
import sys
import time

import pydicom

tool, listing, out = sys.argv[1], sys.argv[2], sys.argv[3]
if tool == "dicognito":
    from dicognito.anonymizer import Anonymizer

    anonymizer = Anonymizer()

    def deidentify(ds):
        anonymizer.anonymize(ds)
        return ds
elif tool == "deid":
    from deid.dicom import replace_identifiers

    logging.disable(logging.CRITICAL)

    def deidentify(ds):
        (result,) = replace_identifiers(dicom_files=[ds], save=False)
        return result
else:
    sys.exit(f"unknown tool {tool!r}: dicognito or deid")

files = [line.strip() for line in open(listing) if line.strip()]
os.makedirs(out, exist_ok=True)
blobs = [open(f, "rb").read() for f in files]

written = failed = 0
t0 = time.perf_counter()
for i, f in enumerate(files):
    try:
        deidentify(pydicom.dcmread(f)).save_as(os.path.join(out, f"{i}.dcm"))
        written += 1
    except Exception:
        failed += 1
seconds = time.perf_counter() - t0

t0 = time.perf_counter()
for b in blobs:
    try:
        deidentify(pydicom.dcmread(io.BytesIO(b))).save_as(io.BytesIO())
    except Exception:
        pass
seconds_memory = time.perf_counter() - t0
print(json.dumps({"files": len(files), "written": written, "failed": failed,
                  "seconds": seconds, "seconds_memory": seconds_memory}))
