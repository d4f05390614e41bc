"""The `link` façade, drop-in compatible with datajoint-link: `from link import link`."""

from link.facade import LinkError, PullSummary, link

__all__ = ["LinkError", "PullSummary", "link"]
