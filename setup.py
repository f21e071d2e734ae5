"""Everything about the package is in pyproject.toml but the one compiled module, which setuptools cannot
declare there: cffi's hook builds sites/storage/xts_build.py's extension (OpenSSL's AES-XTS over many
sectors, sites/storage/xts.py) with the package."""
from setuptools import setup

setup(cffi_modules=["sites/storage/xts_build.py:ffibuilder"])
