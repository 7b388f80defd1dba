"""Feature extractors: each returns the list of feature maps the heads read, and lists their
channel counts in `out_channels`."""
