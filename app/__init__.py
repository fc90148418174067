"""hello-birthday: stores dates of birth and greets people with the days to their birthday."""

__version__ = "0.1.0"
