"""The admin API's query parameters: a whole number is ASCII digits within its bounds, and
anything else is refused naming the parameter (never a 500, never another message)."""

import pytest

from meterline.params import whole_number


@pytest.mark.parametrize("text", ["", " 5", "-1", "0", "10001", "1.5", "0x10",
                                  "²",  # str.isdigit, but int() refuses it
                                  "\u0661\u0660",  # Arabic-Indic 10: int() takes it
                                  "9" * 5000])  # past int()'s 4,300 digits
def test_a_whole_number_out_of_bounds_or_not_in_ascii_digits_is_refused_naming_it(text):
    with pytest.raises(ValueError, match=r"^top must be a whole number from 1 to 10000, got "):
        whole_number("top", text, 1, 10_000)


def test_a_whole_number_may_have_leading_zeros():
    assert whole_number("top", "0000000000042", 1, 10_000) == 42
