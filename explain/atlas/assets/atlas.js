// Concept atlas: class search and column sorting on the index pages; hover preview and concept highlight on the map.
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

function setUpSorting() {
  for (const table of document.querySelectorAll("table.sortable")) {
    const body = table.tBodies[0];
    table.querySelectorAll("th").forEach((header, column) => {
      header.addEventListener("click", () => {
        const numeric = header.classList.contains("num");
        // numbers sort largest first on the first click, names A to Z; a second click reverses
        const first = numeric ? "descending" : "ascending";
        const order = header.getAttribute("aria-sort") === first ? (numeric ? "ascending" : "descending") : first;
        const key = (row) => {
          const cell = row.cells[column];
          return numeric ? Number(cell.dataset.sort ?? cell.textContent) : cell.textContent.trim().toLowerCase();
        };
        const sign = order === "ascending" ? 1 : -1;
        const rows = Array.from(body.rows).sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * sign);
        for (const other of table.querySelectorAll("th")) other.removeAttribute("aria-sort");
        header.setAttribute("aria-sort", order);
        body.append(...rows);
      });
    });
  }
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
  setUpSorting();
  setUpMap();
});
