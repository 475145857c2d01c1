"""Settings every suite's tests share: pytest reads this before any test module.

Hypothesis with no deadline: its default fails an example whose body runs longer than 200 ms
(250 ms while generating), and a loaded CI machine that descheduled the process for that long
during one ~1 ms example failed the whole property with "Unreliable test timings". How long an
example takes is nothing these properties state; a test that means to bound a time asserts it.
"""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("livegifts", deadline=None)
settings.load_profile("livegifts")
