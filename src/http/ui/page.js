// The live page at /ui (docs/contract.md, "HTTP"): counts per state and the deployments needing a person from
// GET /api/summary, corrected every 30 s; the transitions as they happen from GET /api/watch (server-sent events).
// Plain browser JavaScript, served as it is written (no build step). Everything shown from the server goes in
// through textContent or an attribute, never as HTML.
'use strict';

(() => {
  const STATES = ['pending', 'deploying', 'ready', 'failed', 'unknown'];
  /** the transitions kept on the page */
  const MAX_TRANSITIONS = 50;
  /** how often the counts are read again, to correct what the live updates got wrong (a missed or repeated entry) */
  const REFRESH_MS = 30_000;
  /** the live region speaks at most this often, summing up what happened meanwhile */
  const ANNOUNCE_MS = 10_000;
  /** after the browser gave up on the stream (an answer that was not the stream): when to open it again */
  const REOPEN_MS = 5_000;
  /** a failure needs a person for a day (the summary's `failedSince`) */
  const FAILED_WITHIN_MS = 24 * 60 * 60 * 1000;

  const byId = (id) => document.getElementById(id);

  /** An element with attributes and children; strings become text nodes (never HTML). */
  function h(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes ?? {})) node.setAttribute(name, String(value));
    for (const child of children) node.append(typeof child === 'string' ? document.createTextNode(child) : child);
    return node;
  }

  const clockTime = (iso) => {
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleTimeString();
  };
  const dayAndTime = (iso) => {
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
  };
  const time = (iso, text) => h('time', { datetime: iso }, text);
  const deploymentLink = (id, text) => h('a', { href: `/api/deployments/${encodeURIComponent(id)}` }, h('code', {}, text));

  // ---- the page's state ----------------------------------------------------------------------------------------

  /** counts per state, null until the first summary */
  let counts = null;
  /** when the summary the counts and the attention list start from was read (ms) */
  let summaryAt = 0;
  /** the deployments needing a person: {deploymentId, name, state, since} */
  let attention = [];
  /** names the summary gave, for deployments that enter attention live (a transition carries no name) */
  const names = new Map();
  /** each deployment's last version applied: the stream delivers at least once, and a repeat must not count twice */
  const versions = new Map();
  /** while a summary is being read: the transitions that arrived meanwhile (the summary may or may not hold them) */
  let arrivedDuringRead = null;
  /** a read was asked for while one was under way (after a resync: that one may be from before the gap) */
  let readAgain = false;
  let source = null;
  /** the last cursor the stream gave, to open it again where it was */
  let cursor = '';
  let unannounced = [];
  let announceTimer = null;

  // ---- rendering ----------------------------------------------------------------------------------------------

  function setConnection(state, text) {
    const node = byId('connection');
    node.dataset.state = state;
    node.textContent = text;
  }

  function renderCounts() {
    for (const state of STATES) byId(`count-${state}`).textContent = counts === null ? '–' : String(counts[state]);
  }

  function renderAttention() {
    const cutoff = Date.now() - FAILED_WITHIN_MS;
    attention = attention.filter((a) => a.state === 'unknown' || Date.parse(a.since) >= cutoff);
    const items = attention.map((a) =>
      h(
        'li',
        { 'data-deployment-id': a.deploymentId, 'data-state': a.state },
        deploymentLink(a.deploymentId, a.name === '' ? a.deploymentId : a.name),
        ' ',
        h('span', { class: `state state-${a.state}` }, a.state),
        ' since ',
        time(a.since, dayAndTime(a.since)),
        a.name === '' ? '' : h('span', { class: 'id' }, ` ${a.deploymentId}`),
      ),
    );
    byId('attention').replaceChildren(...(items.length > 0 ? items : [h('li', { class: 'empty' }, 'Nothing needs a person.')]));
  }

  function transitionRow(t) {
    return h(
      'li',
      { 'data-deployment-id': t.deploymentId, 'data-to': t.to, 'data-version': t.version },
      time(t.at, clockTime(t.at)),
      ' ',
      deploymentLink(t.deploymentId, t.deploymentId),
      ' ',
      h(
        'span',
        { class: 'move' },
        h('span', { class: `state state-${t.from}` }, t.from === '' ? 'created' : t.from),
        ' → ',
        h('span', { class: `state state-${t.to}` }, t.to),
      ),
      ' ',
      h('span', { class: 'meta' }, `v${t.version} · ${t.reason}${t.actor ? ` · ${t.actor}` : ''}`),
    );
  }

  function prepend(row) {
    const list = byId('transitions');
    list.prepend(row);
    while (list.children.length > MAX_TRANSITIONS) list.lastElementChild.remove();
  }

  /** Tells a screen reader what happened, at most every ANNOUNCE_MS, in one sentence. */
  function announce(t) {
    unannounced.push(t);
    if (announceTimer !== null) return;
    announceTimer = setTimeout(() => {
      announceTimer = null;
      const last = unannounced[unannounced.length - 1];
      const more = unannounced.length - 1;
      unannounced = [];
      if (last === undefined) return;
      const sentence = `${last.deploymentId.slice(0, 8)} went from ${last.from || 'nothing'} to ${last.to}`;
      byId('announcer').textContent = more === 0 ? sentence : `${more + 1} transitions; the last: ${sentence}`;
    }, ANNOUNCE_MS);
  }

  // ---- the summary ----------------------------------------------------------------------------------------------

  /**
   * Moves the counts and the attention list by a transition the summary they started from cannot hold: one later
   * than it. An earlier one is in it already: one the stream sent again (it delivers at least once; after a resync the
   * relay may send a whole stretch again), or one from before the summary caught up after a reconnect. `at` is the
   * applying worker's clock and the summary's the server's: what a skew between them gets wrong, the next summary
   * puts right.
   */
  function applyToSummary(t) {
    if (counts === null || !(Date.parse(t.at) > summaryAt)) return;
    if (STATES.includes(t.from)) counts[t.from] = Math.max(0, counts[t.from] - 1);
    if (STATES.includes(t.to)) counts[t.to] += 1;
    // a deployment needs a person as it goes `unknown` or `failed`, and no longer as it goes elsewhere
    attention = attention.filter((a) => a.deploymentId !== t.deploymentId);
    if (t.to === 'unknown' || t.to === 'failed') {
      attention.unshift({ deploymentId: t.deploymentId, name: names.get(t.deploymentId) ?? '', state: t.to, since: t.at });
    }
  }

  async function loadSummary() {
    if (arrivedDuringRead !== null) {
      readAgain = true; // one read at a time
      return;
    }
    arrivedDuringRead = [];
    readAgain = false;
    try {
      const res = await fetch('/api/summary', { headers: { accept: 'application/json' }, cache: 'no-store' });
      if (!res.ok) throw new Error(`GET /api/summary answered ${res.status}`);
      const summary = await res.json();
      counts = { ...summary.counts };
      summaryAt = Date.parse(summary.at);
      for (const a of summary.attention) names.set(a.deploymentId, a.name);
      attention = summary.attention.slice();
      // what arrived while the summary was read: the summary may not hold it
      for (const t of arrivedDuringRead) applyToSummary(t);
      renderCounts();
      renderAttention();
      byId('summary-note').replaceChildren('Counted at ', time(summary.at, clockTime(summary.at)), '; kept current as transitions arrive.');
    } catch (err) {
      byId('summary-note').textContent = `The counts could not be read (${err instanceof Error ? err.message : String(err)}); trying again shortly.`;
    } finally {
      arrivedDuringRead = null;
    }
    if (readAgain) await loadSummary();
  }

  // ---- the stream -----------------------------------------------------------------------------------------------

  function onTransition(t) {
    const last = versions.get(t.deploymentId);
    if (last !== undefined && Number(t.version) <= last) return; // a repeat (at least once)
    versions.set(t.deploymentId, Number(t.version));
    if (arrivedDuringRead !== null) arrivedDuringRead.push(t);
    applyToSummary(t);
    renderCounts();
    renderAttention();
    prepend(transitionRow(t));
    announce(t);
  }

  /** Opens the stream: from `after` (a cursor), or from now. The browser resumes it itself with Last-Event-ID. */
  function open(after) {
    source?.close();
    const es = new EventSource(after ? `/api/watch?after=${encodeURIComponent(after)}` : '/api/watch');
    source = es;
    es.addEventListener('open', () => setConnection('live', 'Live'));
    es.addEventListener('transition', (event) => {
      let t;
      try {
        t = JSON.parse(event.data);
      } catch {
        return;
      }
      if (typeof t !== 'object' || t === null || typeof t.deploymentId !== 'string' || typeof t.to !== 'string') return;
      cursor = event.lastEventId;
      onTransition({ ...t, from: typeof t.from === 'string' ? t.from : '' });
    });
    // the server cannot follow on from where the page was (resync) or the page fell behind (overflow): read the
    // counts again and follow from now; the list says that transitions may be missing before that point
    for (const name of ['resync', 'overflow']) es.addEventListener(name, () => startOver(name));
    es.addEventListener('error', () => {
      if (es !== source) return;
      if (es.readyState === EventSource.CONNECTING) {
        setConnection('reconnecting', 'Reconnecting…');
        return;
      }
      // closed for good (an answer that was not the stream, as a proxy's 502 while the fleet restarts): open it again
      // from the last transition's cursor and read the counts again. Without one (no transition yet: the start id
      // fires no event) it can only start over from now, and what happened meanwhile shows in the counts alone.
      setConnection('offline', 'Disconnected; retrying in a few seconds');
      setTimeout(() => {
        if (es !== source) return;
        if (cursor === '') return startOver('reconnected');
        open(cursor);
        void loadSummary();
      }, REOPEN_MS);
    });
  }

  function startOver(why) {
    source?.close();
    source = null;
    cursor = '';
    setConnection('reconnecting', 'Catching up…');
    prepend(h('li', { class: 'gap' }, `Started over at ${new Date().toLocaleTimeString()} (${why}): earlier transitions may be missing here.`));
    open('');
    void loadSummary();
  }

  renderAttention();
  open('');
  void loadSummary();
  setInterval(() => void loadSummary(), REFRESH_MS);
})();
