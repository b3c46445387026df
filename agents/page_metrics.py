"""What the browser measures of a page: Navigation Timing, first paint and web vitals.

An init script (run in every document before the page's own scripts) keeps
PerformanceObservers for paint, largest contentful paint, layout shifts and event
timing; ``read_timings`` reads them with the document's Navigation Timing entry.
A value the browser did not report (a metric not supported, no interaction yet for
INP, no load event yet) is ``None``, never a guess.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from playwright.async_api import BrowserContext, Page
from playwright.async_api import Error as PlaywrightError

from schemas.events import PageTimings

LOAD_WAIT_MS = 5_000  # how long a page's arrival waits for its load event
READ_TIMEOUT = 3.0  # seconds a page gets to answer a read of its timings
PAINT_WAIT = 2.0  # seconds an arrival waits for the first paint to be reported
MS_MAX = 24 * 3600 * 1000.0  # the bounds of PageTimings
CLS_MAX = 1000.0

# CLS as web-vitals defines it: the largest burst of shifts without recent input
# (shifts under 1 s apart, a burst at most 5 s long); INP: the 98th percentile of
# each interaction's longest event, which below 50 interactions is the longest.
VITALS_SCRIPT = """
(() => {
  if (window.top !== window || window.__trafficbusterVitals) return;
  const v = { fcp: null, lcp: null, cls: null, burst: 0, first: 0, last: 0,
              events: new Map(), observers: [] };
  Object.defineProperty(window, '__trafficbusterVitals', { value: v });
  const observe = (type, each, extra) => {
    try {
      const observer = new PerformanceObserver(list => list.getEntries().forEach(each));
      observer.observe(Object.assign({ type, buffered: true }, extra));
      v.observers.push([observer, each]);
      return true;
    } catch (e) { return false; }
  };
  // entries not yet delivered to the callbacks (they come in idle time), taken now
  v.flush = () => v.observers.forEach(([o, each]) => o.takeRecords().forEach(each));
  observe('paint', e => { if (e.name === 'first-contentful-paint') v.fcp = e.startTime; });
  observe('largest-contentful-paint', e => { v.lcp = e.startTime; });
  if (observe('layout-shift', e => {
    if (e.hadRecentInput) return;
    const joins = v.burst > 0 && e.startTime - v.last < 1000 && e.startTime - v.first < 5000;
    if (joins) { v.burst += e.value; } else { v.burst = e.value; v.first = e.startTime; }
    v.last = e.startTime;
    v.cls = Math.max(v.cls || 0, v.burst);
  })) v.cls = v.cls || 0;
  observe('event', e => {
    if (!e.interactionId) return;
    v.events.set(e.interactionId, Math.max(v.events.get(e.interactionId) || 0, e.duration));
  }, { durationThreshold: 16 });
})();
"""

# first paint and its largest element are reported once the frame has been presented,
# which under load comes well after the load event
PAINTED_SCRIPT = """
() => {
  const v = window.__trafficbusterVitals;
  if (!v) return true;
  v.flush();
  return v.fcp !== null && v.lcp !== null;
}
"""

READ_SCRIPT = """
() => {
  const nav = performance.getEntriesByType('navigation')[0];
  const at = name => (nav && nav[name] > 0 ? nav[name] : null);
  const v = window.__trafficbusterVitals;
  if (v) v.flush();
  let inp = null;
  if (v && v.events.size) {
    const longest = [...v.events.values()].sort((a, b) => b - a);
    inp = longest[Math.min(longest.length - 1, Math.floor(longest.length / 50))];
  }
  return {
    ttfb_ms: at('responseStart'),
    dom_content_loaded_ms: at('domContentLoadedEventEnd'),
    load_ms: at('loadEventEnd'),
    fcp_ms: v ? v.fcp : null,
    lcp_ms: v ? v.lcp : null,
    cls: v ? v.cls : null,
    inp_ms: inp,
  };
}
"""


async def watch_vitals(context: BrowserContext) -> None:
    await context.add_init_script(VITALS_SCRIPT)


async def read_timings(page: Page) -> PageTimings | None:
    """The page's timings now; ``None`` when the page cannot be asked (it is navigating
    away, closed, or too busy to answer in time)."""
    try:
        async with asyncio.timeout(READ_TIMEOUT):
            raw: dict[str, Any] = await page.evaluate(READ_SCRIPT)
    except (PlaywrightError, TimeoutError):
        return None
    return PageTimings(
        **{k: _measured(v, CLS_MAX if k == "cls" else MS_MAX) for k, v in raw.items()}
    )


async def arrival_timings(page: Page, wait_ms: float = LOAD_WAIT_MS) -> PageTimings | None:
    """The timings of a page just arrived on, once its load event has fired (or
    ``wait_ms`` passed: a page still loading reports what it has)."""
    with contextlib.suppress(PlaywrightError, TimeoutError):
        await page.wait_for_load_state("load", timeout=max(1.0, wait_ms))
    with contextlib.suppress(PlaywrightError, TimeoutError):
        # a page with nothing contentful never paints one: bounded, and by our clock
        async with asyncio.timeout(PAINT_WAIT):
            await page.wait_for_function(PAINTED_SCRIPT, polling=50, timeout=PAINT_WAIT * 1000)
    return await read_timings(page)


def _measured(value: object, limit: float) -> float | None:
    """A number the page reported, held within what the event accepts (a page's
    scripts can touch what the browser reports; the event must still decode)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return None
    return min(limit, max(0.0, round(float(value), 3)))
