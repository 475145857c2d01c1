"""The ISO 4217 currencies money may be counted in: one table for every service.

Three capital letters are not enough: "XYZ", or a typo of a code ("UDS"), would be taken as a
currency no provider pays out in. A code ISO adds later (as XCG and ZWG were in 2024-2025) is
added here.
"""

from __future__ import annotations

# ISO 4217 list one, the currencies in use (2026): without the fund codes (BOV, CHE, CHW, CLF,
# COU, MXV, USN, UYI, UYW), precious metals (XAG, XAU, XPD, XPT), bond-market and accounting units
# (XAD, XBA..XBD, XDR, XSU, XUA), the test code XTS and "no currency" XXX, none of which is paid
# out; and without codes withdrawn (ANG, BGN, CUC, HRK, SLL, ZWL). tests/unit/test_currencies.py
# holds it to ISO's published list (a dev dependency, iso4217, carries it): a code ISO adds or
# withdraws fails that test once the package is updated, until it is added here or excluded there.
ISO_4217_CURRENCIES: frozenset[str] = frozenset(
    """
    AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BHD BIF BMD BND BOB BRL BSD BTN BWP BYN BZD
    CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS
    GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW
    KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR
    MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR
    SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX
    USD UYU UZS VED VES VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG
    """.split()
)
