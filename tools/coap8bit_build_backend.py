"""PEP 517 build backend: setuptools' own, plus one fix for editable installs of ``coap8bit.kernels``.

The repo's ``kernels/`` folder ships as ``coap8bit.kernels`` (pyproject.toml's package-dir) and has no
``__init__.py``, so that a source checkout cannot shadow Hugging Face's ``kernels`` package (see the comment
in pyproject.toml). Wheels and sdists are setuptools' unchanged. ``pip install -e .`` is not: setuptools'
editable finder cannot import a namespace package mapped from outside its parent package's folder
(pypa/setuptools#4943, "PEP 420 namespace packages via package_dir don't work with editable installs"), so
``import coap8bit.kernels`` would fail. ``build_editable`` therefore adds to setuptools' editable wheel a
``.pth`` file and a small finder that resolve exactly ``coap8bit.kernels`` to this checkout's ``kernels/``;
everything below it (``coap8bit.kernels.quant``, new modules too) is then found by the normal import system.
Once kernels/ lives at coap8bit/kernels/ (or setuptools fixes the issue), this file can go.
"""
from __future__ import annotations

import base64
import hashlib
import os
import zipfile

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (every hook but build_editable is setuptools')

_NAME = "__editable___coap8bit_kernels_finder"
_FINDER = '''\
"""coap8bit.kernels -> {path} (installed by coap8bit's editable install; see its
tools/coap8bit_build_backend.py)."""
import sys
from importlib.machinery import ModuleSpec

PATH = {path!r}


class KernelsFinder:
    @staticmethod
    def find_spec(fullname, path=None, target=None):
        if fullname != "coap8bit.kernels":
            return None
        spec = ModuleSpec(fullname, None, is_package=True)  # a namespace package, as in an installed wheel
        spec.submodule_search_locations = [PATH]
        return spec


if KernelsFinder not in sys.meta_path:
    sys.meta_path.append(KernelsFinder)
'''


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    kernels = os.path.abspath("kernels")  # a PEP 517 backend runs in the project root
    _add_to_wheel(os.path.join(wheel_directory, name), {
        f"{_NAME}.py": _FINDER.format(path=kernels).encode(),
        f"{_NAME}.pth": f"import {_NAME}\n".encode(),
    })
    return name


def _add_to_wheel(wheel: str, files: dict[str, bytes]) -> None:
    """Rewrite ``wheel`` with ``files`` added at its root, listed in its RECORD."""
    with zipfile.ZipFile(wheel) as zf:
        entries = [(info, zf.read(info)) for info in zf.infolist()]
    record = next(info.filename for info, _ in entries if info.filename.endswith(".dist-info/RECORD"))
    tmp = wheel + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in entries:
            if info.filename == record:
                lines = [data.decode().rstrip("\n")]
                for fname, content in files.items():
                    digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
                    lines.insert(0, f"{fname},sha256={digest},{len(content)}")
                data = ("\n".join(lines) + "\n").encode()
            zf.writestr(info, data)
        for fname, content in files.items():
            zf.writestr(fname, content)
    os.replace(tmp, wheel)
