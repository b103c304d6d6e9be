// ollamamq admin: refresh the page's live part every 2 s, and send actions without a reload.
"use strict";

(() => {
  const INTERVAL_MS = 2000;
  const live = document.getElementById("live");
  const status = document.getElementById("live-status");
  const token = document.querySelector('meta[name="csrf-token"]').content;
  let busy = false;
  let again = false;

  function showStatus(ok) {
    if (!status) return;
    status.classList.toggle("offline", !ok);
    status.textContent = ok ? "live" : "offline";
  }

  function toast(message) {
    const box = document.getElementById("toast");
    box.textContent = message;
    box.hidden = false;
    clearTimeout(box.timer);
    box.timer = setTimeout(() => { box.hidden = true; }, 5000);
  }

  // Fetch the fragment (with this page's query string, e.g. the users' sort) and swap it in.
  async function refresh() {
    if (!live) return;
    if (busy) { again = true; return; }
    busy = true;
    try {
      const response = await fetch(live.dataset.fragment + location.search, {
        headers: { Accept: "text/html" },
        cache: "no-store",
      });
      if (response.status === 401 || response.status === 403) {
        location.reload(); // the session ended: the page itself goes to the login
        return;
      }
      if (response.ok) live.innerHTML = await response.text();
      showStatus(response.ok);
    } catch (error) {
      showStatus(false);
    } finally {
      busy = false;
      if (again) { again = false; refresh(); }
    }
  }

  // Action forms post with the CSRF header and get JSON back; then the data is refreshed.
  document.addEventListener("submit", async (event) => {
    const form = event.target;
    if (!form.hasAttribute("data-action")) return;
    event.preventDefault();
    if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) return;
    form.querySelectorAll("button").forEach((button) => { button.disabled = true; });
    try {
      const response = await fetch(form.action, {
        method: "POST",
        headers: { "X-CSRFToken": token, Accept: "application/json" },
      });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        toast(body.error || `${response.status} ${response.statusText}`);
      }
    } catch (error) {
      toast("The proxy did not answer: " + error.message);
    }
    if (live) refresh();
    else location.replace(location.pathname); // a page without a live part: show the change
  });

  // Copy buttons: the text of the element they name, e.g. a key shown once.
  document.addEventListener("click", async (event) => {
    const button = event.target.closest("[data-copy]");
    if (!button) return;
    const text = document.getElementById(button.dataset.copy).textContent;
    try {
      await navigator.clipboard.writeText(text);
      toast("Copied.");
    } catch (error) {
      toast("Copy failed: select the key and copy it by hand.");
    }
  });

  if (live) setInterval(() => { if (!document.hidden) refresh(); }, INTERVAL_MS);
})();
