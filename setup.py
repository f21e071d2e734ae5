"""Everything about the package is in pyproject.toml but the compiled modules, which setuptools cannot declare
there: cffi's hook builds them with the package. sites/storage/xts_build.py: OpenSSL's AES-XTS over many
sectors (sites/storage/xts.py); datapath/writepath_build.py: a guest write's NBD receiving and log records
(datapath/nbd.py, datapath/logformat.py)."""
from setuptools import setup

setup(cffi_modules=["sites/storage/xts_build.py:ffibuilder", "datapath/writepath_build.py:ffibuilder"])
