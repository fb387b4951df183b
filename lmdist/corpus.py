"""The built-in corpus: Python standard-library source, so the main job needs no download.

A fixed list of pure-Python modules that every CPython 3.10+ installation ships as source. Each
module is one document. The text still differs a little between Python versions, so the corpus
fingerprint (sha256 of the documents) is logged with every run: compare runs only when it matches.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig

from lmdist.errors import DataError

MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "cmd", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "enum", "fnmatch", "fractions", "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac",
    "html", "ipaddress", "json.decoder", "json.encoder", "logging", "mimetypes", "numbers", "optparse",
    "pathlib", "pprint", "queue", "random", "sched", "shlex", "shutil", "statistics", "string",
    "tempfile", "textwrap", "threading", "tokenize", "traceback", "typing", "uuid", "warnings", "zipfile",
)


def module_path(name: str) -> str:
    """The source file of a standard-library module (`pkg.mod` -> pkg/mod.py or pkg/mod/__init__.py)."""
    base = os.path.join(sysconfig.get_paths()["stdlib"], *name.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    raise DataError(
        f"the built-in corpus needs the source of the standard-library module {name!r}, which this Python "
        f"does not ship (looked in {base}.py); pass --dataset with your own text instead"
    )


def builtin_documents() -> list[str]:
    """The corpus, one string per module, in the fixed order of MODULES."""
    docs = []
    for name in MODULES:
        with open(module_path(name), encoding="utf-8") as f:
            docs.append(f.read())
    return docs


def fingerprint(docs: list[str]) -> str:
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(doc.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]
