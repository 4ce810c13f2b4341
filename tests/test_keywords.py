"""NSG's header cards: what is written is what a resumed run reads back."""

from __future__ import annotations

import pytest
from astropy.io import fits

from nsg_gpu.keywords import NSGCards, read_nsg_cards, set_nsg_keywords


@pytest.mark.parametrize("channels", [1, 3], ids=["mono", "colour"])
def test_cards_read_back_as_written(channels):
    cards = NSGCards(
        reference_name="x" * 80 + "_ref.fits",
        transmission=[0.91234, 0.5, 0.25][:channels],
        snr=[0.8, 0.7, 0.6][:channels],
        weight=0.640123,
        weight_source="noiseKSigma",
        high=1.25,
        star_pairs=412,
        samples=1650,
        fwhm=2.8125,
        photometry="aperture-fitted",
        beta=3.25,
        ellipticity=0.2771,
        elongation_angle=54.68,
        fingerprint="ab" * 16,
        noise=[1.5e-3, 2e-3, 2.5e-3][:channels],
        transmission_error=[0.0123456, 0.02, 0.03][:channels],
        history=["reference", "sample_size: 20"],
    )
    header = fits.Header()
    header["NSGS2"] = 7.0  # an earlier run's card, replaced
    header.add_history("NSG.old: 1")
    header.add_history("calibrated")
    written = set_nsg_keywords(header, cards, weight_keyword="MYWEIGHT")
    back = read_nsg_cards(written, weight_keyword="MYWEIGHT")
    assert back.reference_name == cards.reference_name[-68:]
    # Every value to the 16 significant digits a card holds: a resumed run's rows and its
    # rejection read what the run computed, not a rounding of it.
    exact = dict(rel=1e-15, abs=0)
    assert back.transmission == pytest.approx(cards.transmission, **exact)
    assert back.snr == pytest.approx(cards.snr, **exact) and back.noise == pytest.approx(cards.noise, **exact)
    assert back.weight == pytest.approx(cards.weight, **exact) and back.weight_source == "noiseKSigma"
    assert (back.star_pairs, back.samples, back.fingerprint) == (412, 1650, "ab" * 16)
    assert back.high == 1.25 and back.fwhm == 2.8125 and back.beta == 3.25
    assert back.photometry == "aperture-fitted" and written["NSGPHOT"] == "aperture-fitted"
    assert (back.ellipticity, back.elongation_angle) == pytest.approx((0.2771, 54.68), **exact)
    assert back.transmission_error == pytest.approx(cards.transmission_error, **exact)
    assert written["NSGSERR0"] == pytest.approx(0.0123456, **exact) and f"NSGSERR{channels}" not in written
    assert back.history == cards.history
    assert [str(h) for h in written["HISTORY"]][0] == "calibrated"
    assert ("NSGS2" in written) == (channels == 3)
    assert "NWEIGHT" not in written


def test_a_channel_without_an_error_keeps_the_later_channels_errors_in_place():
    """A fit with too few pairs gives no error (no NSGSERRn card): the next channel's error is
    read back as that channel's, so a resumed run judges the scale as the fresh run did."""
    cards = NSGCards(
        reference_name="ref.fits",
        transmission=[2.79, 2.07, 3.09],
        snr=[1.0, 1.0, 1.0],
        weight=6.5,
        transmission_error=[0.097, None, 0.15],
    )
    written = set_nsg_keywords(fits.Header(), cards)
    assert "NSGSERR1" not in written and "NSGSERR2" in written
    assert read_nsg_cards(written).transmission_error == [pytest.approx(0.097), None, pytest.approx(0.15)]
    # An output of a version that wrote no errors: none for any channel.
    del written["NSGSERR0"], written["NSGSERR2"]
    assert read_nsg_cards(written).transmission_error == [None, None, None]


@pytest.mark.parametrize("length", [8, 40, 50, 58, 68])
def test_reference_card_fits_without_a_truncation_warning(length, tmp_path):
    """A long reference name leaves less room for NSGREF's comment: the card is written
    whole, with what comment fits, and no astropy warning on the console of every write."""
    import warnings

    import numpy as np

    name = ("o'" + "n" * length)[-length:]
    cards = NSGCards(reference_name=name, transmission=[1.0], snr=[1.0], weight=1.0)
    header = set_nsg_keywords(fits.Header(), cards)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fits.writeto(tmp_path / "out.fits", np.zeros((2, 2), np.float32), header)
        card = str(fits.getheader(tmp_path / "out.fits").cards["NSGREF"].image)
    assert fits.getheader(tmp_path / "out.fits")["NSGREF"] == name
    assert len(card) == 80
    if length <= 40:
        assert card.rstrip().endswith("/ NSG reference frame")


def test_the_references_pairs_card_says_it_counts_stars():
    """The reference has no star pairs: its NSGPAIRS counts the stars it measured, and the
    card said "star pairs in the scale fit" on it as on the targets."""
    common = dict(reference_name="r.fits", transmission=[1.0], snr=[1.0], weight=1.0, star_pairs=213)
    reference = set_nsg_keywords(fits.Header(), NSGCards(**common, weight_source="reference"))
    target = set_nsg_keywords(fits.Header(), NSGCards(**common, weight_source="noiseMultiscale"))
    assert reference["NSGPAIRS"] == target["NSGPAIRS"] == 213
    assert reference.comments["NSGPAIRS"] == "NSG reference stars measured"
    assert target.comments["NSGPAIRS"] == "NSG star pairs in the scale fit"


def test_long_history_lines_stay_nsgs_when_normalized_again(tmp_path):
    """A history line longer than a card (many --reject-circles, a long file name) was split
    by astropy into cards whose continuations lacked ``NSG.``: normalizing the output again
    kept them as someone else's history, one more each time. Now every card of the line
    starts with ``NSG.`` and a second pass gives the same cards."""
    circles = ";".join(f"{100 * i},{37 * i},30" for i in range(12))
    cards = NSGCards(
        reference_name="r.fits", transmission=[1.0], snr=[1.0], weight=1.0, history=[f"reject_circles: {circles}"]
    )
    original = fits.Header()
    original.add_history("calibrated by someone else")
    once = set_nsg_keywords(original, cards)
    fits.PrimaryHDU(header=once).writeto(tmp_path / "once.fits")
    twice = set_nsg_keywords(fits.getheader(tmp_path / "once.fits"), cards)
    history = [str(h) for h in twice["HISTORY"]]
    assert history == [str(h) for h in once["HISTORY"]]
    assert history[0] == "calibrated by someone else" and len(history) == 4
    assert all(h.startswith("NSG.reject_circles") and len(h) <= 72 for h in history[1:])
    joined = history[1] + "".join(h.split(": ", 1)[1] for h in history[2:])
    assert joined == f"NSG.reject_circles: {circles}"
