"""Crawl and ingest: a polite web crawler, WARC (Common Crawl) files and source code trees."""

from tasks.crawl.config import CodeSource, CrawlConfig, WarcSource, WebSource
from tasks.crawl.stage import CrawlStage

__all__ = ["CodeSource", "CrawlConfig", "CrawlStage", "WarcSource", "WebSource"]
