// dualwrite console: live updates of the maps table (server-sent events)
// and reordering of the run dialog's maps (drag, or the ↑/↓ buttons).
"use strict";

function liveTable() {
  const live = document.querySelector("[data-live]");
  if (!live || !window.EventSource) return;
  const events = new EventSource(live.dataset.live);
  events.addEventListener("maps", (e) => {
    live.innerHTML = e.data;
  });
}

function move(item, up) {
  const list = item.parentElement;
  if (up && item.previousElementSibling) {
    list.insertBefore(item, item.previousElementSibling);
  } else if (!up && item.nextElementSibling) {
    list.insertBefore(item.nextElementSibling, item);
  }
}

function reorderable() {
  const list = document.getElementById("order");
  if (!list) return;
  list.addEventListener("click", (e) => {
    const button = e.target.closest("button.up, button.down");
    if (!button) return;
    move(button.closest("li"), button.classList.contains("up"));
    button.focus();
  });
  let dragged = null;
  list.addEventListener("dragstart", (e) => {
    dragged = e.target.closest("li");
    e.dataTransfer.effectAllowed = "move";
    e.dataTransfer.setData("text/plain", dragged.dataset.map);
  });
  list.addEventListener("dragover", (e) => {
    if (dragged) e.preventDefault();
  });
  list.addEventListener("drop", (e) => {
    e.preventDefault();
    const target = e.target.closest("li");
    if (!dragged || !target || target === dragged) return;
    const before = target.getBoundingClientRect().top + target.offsetHeight / 2 > e.clientY;
    list.insertBefore(dragged, before ? target : target.nextElementSibling);
    dragged = null;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  liveTable();
  reorderable();
});
