"""The shared checks: one message each, naming the argument, its value and the fix."""

import subprocess
import sys

import numpy as np
import pytest

from jvdm import validate
from jvdm.errors import JvdmUserError


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "4", None])
def test_positive_int_rejects_what_is_not_a_positive_integer(value):
    with pytest.raises(JvdmUserError, match=r"steps=.*; expected a positive integer \(or None\)"):
        validate.positive_int(value, "steps", " (or None)")


def test_positive_int_accepts_python_and_numpy_integers():
    assert validate.positive_int(3, "n") == 3
    value = validate.positive_int(np.int64(7), "n")
    assert value == 7 and type(value) is int


def test_sampler_names_and_gamma_order():
    assert validate.check_sampler("ddim") == "ddim"
    with pytest.raises(JvdmUserError, match="--sampler='euler'; expected one of ancestral, ddim"):
        validate.check_sampler("euler", "--sampler")
    validate.check_gamma_order(-13.3, 5.0)
    with pytest.raises(JvdmUserError, match="need config.gamma.gamma_max > config.gamma.gamma_min"):
        validate.check_gamma_order(5.0, 5.0, "config.gamma.")


def test_image_checks_name_the_shape_and_dtype():
    validate.check_images(np.zeros((2, 8, 8, 1), np.uint8), (8, 8, 1))
    with pytest.raises(JvdmUserError, match=r"images of \(8, 8, 3\).*built for \(8, 8, 1\)"):
        validate.check_images(np.zeros((2, 8, 8, 3), np.uint8), (8, 8, 1))
    with pytest.raises(JvdmUserError, match="dtype float32; expected uint8"):
        validate.check_images(np.zeros((2, 8, 8, 1), np.float32), (8, 8, 1))
    validate.check_sides_divide((28, 28, 1), (1, 2, 2), "dataset 'mnist'")
    with pytest.raises(JvdmUserError, match=r"'mnist': H and W must be multiples of 8"):
        validate.check_sides_divide((28, 28, 1), (1, 2, 2, 2), "dataset 'mnist'")


def test_the_module_imports_only_the_standard_library():
    code = "import sys, jvdm.validate; sys.exit('numpy' in sys.modules or 'jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
