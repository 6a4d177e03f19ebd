"""The one exception the data layer raises for unusable data sets, URLs and settings."""


class DataError(ValueError):
    """A data set, URL or data setting is unusable.

    The message names the URL (credentials stripped) or value, and what is wrong or allowed.
    """
