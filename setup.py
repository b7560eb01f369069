"""Build the Cython extension migrated._core from ext/ (metadata: pyproject.toml)."""
from glob import glob

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "migrated._core",
        ["ext/_core.pyx"],
        include_dirs=["ext"],
        # the included parts and the C headers: editing one rebuilds
        depends=sorted(glob("ext/*.pxi") + glob("ext/*.h")),
        extra_compile_args=["-O3", "-fno-strict-aliasing"],
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}))
