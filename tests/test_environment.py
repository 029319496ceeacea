"""The installed stack is the one the project is built and measured on."""
import importlib.metadata as md
import os

import PIL


def test_pil_is_pillow_simd():
    # Stock Pillow and pillow-simd both provide `PIL`; whichever was installed last
    # owns the files. The PIL that is imported must belong to pillow-simd.
    dist = md.distribution("pillow-simd")
    owned = {os.path.normpath(dist.locate_file(f)) for f in dist.files}
    assert os.path.normpath(PIL.__file__) in owned, f"{PIL.__file__} is not pillow-simd's"
    assert ".post" in PIL.__version__  # pillow-simd versions are Pillow's plus .postN


def test_stock_pillow_is_not_installed():
    try:
        md.distribution("pillow")
    except md.PackageNotFoundError:
        return
    raise AssertionError("stock Pillow is installed beside pillow-simd; `make` removes it")
