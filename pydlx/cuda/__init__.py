"""The Python faces of the C++/CUDA extension (csrc/<family>.cu, loaded as ``pydlx._C``): for each family the
same functions, with the same signatures, as pydlx/triton/<family>.py and pydlx/reference/<family>.py, so that
pydlx/ops picks an implementation module (pydlx/_backend.py) and calls it the same way. Importing these modules
does not load the extension; the dispatcher checks that it loads before choosing this backend."""
