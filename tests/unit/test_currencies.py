"""services/common/currencies.py is ISO 4217 list one as ISO publishes it, less what is never paid out.

The table was written by hand; a payout policy in a currency it lacks is refused (INVALID_CURRENCY),
and one in a code it wrongly holds is taken. The dev dependency iso4217 ships the list one XML of
ISO's maintenance agency, dated: updating it shows each code ISO added or withdrew since.
"""

from __future__ import annotations

import iso4217

from services.common.currencies import ISO_4217_CURRENCIES
from services.wallet.domain import CURRENCY_MINOR_UNITS

# In list one, and no currency a creator is paid in (currencies.py says why each group is left out).
NOT_PAID_OUT = frozenset(
    {
        *("BOV", "CHE", "CHW", "CLF", "COU", "MXV", "USN", "UYI", "UYW"),  # fund codes
        *("XAG", "XAU", "XPD", "XPT"),  # precious metals
        *("XAD", "XBA", "XBB", "XBC", "XBD", "XDR", "XSU", "XUA"),  # bond-market and accounting units
        *("XTS", "XXX"),  # testing, no currency
    }
)
LIST_ONE = {currency.code for currency in iso4217.Currency}


def test_the_table_is_iso_list_one_less_the_codes_never_paid_out() -> None:
    published = iso4217.__published__
    assert sorted(ISO_4217_CURRENCIES - LIST_ONE) == [], f"not (or no longer) in ISO 4217 of {published}"
    assert sorted(LIST_ONE - NOT_PAID_OUT - ISO_4217_CURRENCIES) == [], f"in ISO 4217 of {published}, missing"
    assert sorted(NOT_PAID_OUT - LIST_ONE) == [], f"excluded here, but not in ISO 4217 of {published} any more"
    assert not NOT_PAID_OUT & ISO_4217_CURRENCIES


def test_the_wallets_minor_units_are_iso_4217s() -> None:
    exponents = {currency.code: currency.exponent for currency in iso4217.Currency}
    assert CURRENCY_MINOR_UNITS == {code: exponents[code] for code in CURRENCY_MINOR_UNITS}
