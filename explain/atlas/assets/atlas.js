// Concept atlas: class search on the index pages; hover preview and concept highlight on the class map.
// Data comes from the page's own escaped HTML (data-* attributes); text is only ever set with textContent.
"use strict";

function setUpSearch() {
  const input = document.getElementById("search");
  if (!input) return;
  const rows = Array.from(document.querySelectorAll("#classes tbody tr"));
  const count = document.getElementById("search-count");
  const none = document.getElementById("no-match");
  const filter = () => {
    const query = input.value.trim().toLowerCase();
    let shown = 0;
    for (const row of rows) {
      const hit = query === "" || row.dataset.search.includes(query);
      row.hidden = !hit;
      if (hit) shown += 1;
    }
    count.textContent = query === "" ? rows.length + " classes" : shown + " of " + rows.length + " classes";
    none.hidden = shown > 0;
  };
  input.addEventListener("input", filter);
  filter();
}

function setUpMap() {
  const map = document.getElementById("map");
  if (!map) return;
  const preview = document.getElementById("preview");
  const image = preview.querySelector("img");
  const caption = preview.querySelector("figcaption");
  const points = Array.from(map.querySelectorAll("circle"));
  for (const point of points) {
    point.addEventListener("mouseenter", () => {
      caption.textContent = point.dataset.caption;
      if (point.dataset.thumb) {
        image.src = point.dataset.thumb;
        image.hidden = false;
      } else {
        image.hidden = true;
      }
    });
  }
  const buttons = Array.from(document.querySelectorAll("#legend button"));
  let focus = null;
  for (const button of buttons) {
    button.addEventListener("click", () => {
      focus = focus === button.dataset.concept ? null : button.dataset.concept;
      for (const other of buttons) other.classList.toggle("active", other.dataset.concept === focus);
      for (const point of points) point.classList.toggle("dim", focus !== null && point.dataset.concept !== focus);
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setUpSearch();
  setUpMap();
});
