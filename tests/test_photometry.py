"""Flux calibration: the kernel sum gives nJy per electron; uncalibrated templates are refused."""

from __future__ import annotations

import numpy as np
import pytest
from apbatch.errors import BadInputError, RetriableError
from apbatch.image import Image
from apbatch.job.photometry import photometric_scale, to_njy


def test_photometric_scale_from_kernel_sum():
    sci = Image(np.zeros((4, 4)), metadata={})
    tmpl = Image(np.zeros((4, 4)), metadata={"BUNIT": "nJy"})
    assert photometric_scale(sci, tmpl, 2.0) == 0.5 and sci.metadata["NJY_PER_E"] == 0.5
    img = Image(np.ones((2, 2)), np.ones((2, 2)), metadata={"BUNIT": "electron"})
    to_njy(img, 2.0)
    assert img.image[0, 0] == 2.0 and img.variance[0, 0] == 4.0 and img.metadata["BUNIT"] == "nJy"
    to_njy(img, 2.0)  # already nJy: unchanged
    assert img.image[0, 0] == 2.0


@pytest.mark.parametrize("meta", [{}, {"BUNIT": "electron"}, {"NJY_PER_E": 3.0}])
def test_uncalibrated_template_is_refused_not_labelled_njy(meta):
    # the defect this guards: a warped template without BUNIT made every flux electrons labelled nJy
    with pytest.raises(BadInputError, match="template_coadd.BUNIT"):
        photometric_scale(Image(np.zeros((4, 4))), Image(np.zeros((4, 4)), metadata=meta), 2.0)


@pytest.mark.parametrize("kernel_sum", [0.0, -1.0, float("nan")])
def test_failed_kernel_fit_is_retriable(kernel_sum):
    with pytest.raises(RetriableError):
        photometric_scale(Image(np.zeros((4, 4))), Image(np.zeros((4, 4)), metadata={"BUNIT": "nJy"}),
                                kernel_sum)
