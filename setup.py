"""Build the Cython extension migrated._core from ext/ (metadata: pyproject.toml)."""
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "migrated._core",
        ["ext/_core.pyx"],
        include_dirs=["ext"],
        extra_compile_args=["-O3", "-fno-strict-aliasing"],
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}))
