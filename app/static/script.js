/* Sitewire tracking script: no cookies, no local identifiers. docs/tracking.md */
(function (w, d) {
  "use strict";
  var s = d.currentScript;
  if (!s) return;
  var loc = w.location, nav = w.navigator;
  var attr = function (n) { return s.getAttribute("data-" + n); };
  var site = attr("site") || loc.hostname.replace(/^www\./, "");
  var api = attr("api") || new URL("/api/event", s.src).href;
  var queued = (w.sitewire && w.sitewire.q) || [];
  var pending = [];
  var last = null;

  function ignored() {
    try { if (w.localStorage.getItem("sitewire_ignore") === "true") return true; } catch (e) {}
    var local = /^(localhost|127(\.\d+){3}|\[::1\])$/.test(loc.hostname) || loc.protocol === "file:";
    return (local && attr("allow-localhost") === null) ||
      nav.webdriver || w._phantom || w.__nightmare || w.Cypress;
  }

  function uuid() {
    if (w.crypto && crypto.randomUUID) return crypto.randomUUID();
    var b = crypto.getRandomValues(new Uint8Array(16)), h = "";
    b[6] = (b[6] & 15) | 64; b[8] = (b[8] & 63) | 128;
    for (var i = 0; i < 16; i++) h += (b[i] + 256).toString(16).slice(1) + ([3, 5, 7, 9].indexOf(i) >= 0 ? "-" : "");
    return h;
  }

  /* Each event gets its id once, so a retry is stored once (the server dedupes on it). */
  function send(name, props) {
    if (ignored()) return;
    var ref = /^https?:/.test(d.referrer) ? d.referrer.slice(0, 2000) : null;
    var ev = { site: site, name: String(name).slice(0, 120), url: loc.href.slice(0, 2000),
               referrer: ref, id: uuid() };
    if (props) ev.props = props;
    post({ ev: ev, tries: 0 });
  }

  function post(item) {
    fetch(api, { method: "POST", body: JSON.stringify(item.ev), keepalive: true,
                 credentials: "omit", headers: { "Content-Type": "text/plain" } })
      .then(function (r) { if (r.status === 429 || r.status >= 500) retry(item); })
      .catch(function () { retry(item); });
  }

  /* Offline or server busy: keep a few events in memory and try again briefly. */
  function retry(item) {
    if (++item.tries > 5 || pending.length >= 50) return;
    pending.push(item);
    setTimeout(flush, 500 * Math.pow(2, item.tries));
  }

  function flush() {
    if (nav.onLine === false) return;
    var items = pending; pending = [];
    items.forEach(post);
  }

  function pageview() {
    if (loc.href === last) return;  /* the same URL twice (replaceState, re-renders) */
    last = loc.href;
    send("pageview");
  }

  var hist = w.history;
  ["pushState", "replaceState"].forEach(function (m) {
    var orig = hist[m];
    if (!orig) return;
    hist[m] = function () { var r = orig.apply(this, arguments); pageview(); return r; };
  });
  w.addEventListener("popstate", pageview);
  w.addEventListener("hashchange", function () { if (/^#\//.test(loc.hash)) pageview(); });
  w.addEventListener("online", flush);
  w.addEventListener("pagehide", function () {
    var items = pending; pending = [];
    items.forEach(function (i) {
      nav.sendBeacon && nav.sendBeacon(api, new Blob([JSON.stringify(i.ev)], { type: "text/plain" }));
    });
  });

  /* Outbound links and downloads: sent with keepalive, never delaying the navigation. The
     url without its query and fragment: a link's may hold a token or a signature. */
  var files = /\.(pdf|zip|dmg|exe|msi|csv|xlsx?|docx?|pptx?|mp3|mp4|gz|tgz|7z|apk|iso)$/i;
  d.addEventListener("click", function (e) {
    var a = e.target && e.target.closest && e.target.closest("a[href]");
    if (!a || !/^https?:/.test(a.href)) return;
    var url = (a.origin + a.pathname).slice(0, 2000);
    if (attr("downloads") !== null && files.test(a.pathname)) {
      send("File Download", { url: url });
    } else if (attr("outbound") !== null && a.host !== loc.host) {
      send("Outbound Link: Click", { url: url });
    }
  }, true);

  w.sitewire = function (name, opts) { send(name, opts && opts.props); };
  queued.forEach(function (args) { w.sitewire.apply(null, args); });
  pageview();
})(window, document);
