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
        beta=3.25,
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
    assert back.transmission == pytest.approx(cards.transmission, rel=1e-5)
    assert back.snr == pytest.approx(cards.snr, rel=1e-5) and back.noise == pytest.approx(cards.noise, rel=1e-6)
    assert back.weight == pytest.approx(cards.weight, rel=1e-6) and back.weight_source == "noiseKSigma"
    assert (back.star_pairs, back.samples, back.fingerprint) == (412, 1650, "ab" * 16)
    assert back.high == 1.25 and back.fwhm == pytest.approx(2.8125, rel=1e-3) and back.beta == 3.25
    assert back.transmission_error == pytest.approx(cards.transmission_error, rel=1e-3)
    assert written["NSGSERR0"] == pytest.approx(0.01235) and f"NSGSERR{channels}" not in written
    assert back.history == cards.history
    assert [str(h) for h in written["HISTORY"]][0] == "calibrated"
    assert ("NSGS2" in written) == (channels == 3)
    assert "NWEIGHT" not in written
