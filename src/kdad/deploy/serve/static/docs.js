// kdad API page: lists the endpoints of /openapi.json with their parameters and a curl example.
// Replaces FastAPI's Swagger UI, which loads from a CDN and stays blank offline.
"use strict";

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function resolve(spec, schema) {
  const ref = schema && schema.$ref;
  return ref ? spec.components.schemas[ref.split("/").pop()] : schema || {};
}

function typeOf(spec, schema) {
  const s = resolve(spec, schema);
  if (s.anyOf) return s.anyOf.map((x) => typeOf(spec, x)).join(" | ");
  if (s.type === "array") return `list of ${typeOf(spec, s.items)}`;
  return s.format === "binary" ? "file" : s.type || "object";
}

function bodyFields(spec, op) {
  const content = (op.requestBody && op.requestBody.content) || {};
  const media = Object.keys(content)[0];
  if (!media) return [];
  const schema = resolve(spec, content[media].schema);
  return Object.entries(schema.properties || {}).map(([name, p]) => ({
    name, where: "form", type: typeOf(spec, p), required: (schema.required || []).includes(name),
    description: p.description || "",
  }));
}

function curl(method, path, fields) {
  const parts = [`curl -X ${method.toUpperCase()}`];
  fields.filter((f) => f.where === "form").forEach((f) => {
    const n = f.type.startsWith("list") ? 2 : 1;
    for (let i = 1; i <= n; i++) parts.push(`-F ${f.name}=@image${n > 1 ? i : ""}.png`);
  });
  return `${parts.join(" ")} ${window.location.origin}${path}`;
}

function endpoint(spec, path, method, op) {
  const box = el("section", undefined, "card");
  box.appendChild(el("h2", `${method.toUpperCase()} ${path}`));
  if (op.summary) box.appendChild(el("p", op.summary));
  const fields = (op.parameters || []).map((p) => ({
    name: p.name, where: p.in, type: typeOf(spec, p.schema), required: !!p.required,
    description: p.description || (p.schema && p.schema.description) || "",
  })).concat(bodyFields(spec, op));
  if (fields.length) {
    const table = el("table");
    const head = el("tr");
    ["name", "in", "type", "required", "description"].forEach((h) => head.appendChild(el("th", h)));
    table.appendChild(head);
    fields.forEach((f) => {
      const row = el("tr");
      [f.name, f.where, f.type, f.required ? "yes" : "no", f.description].forEach((v) => row.appendChild(el("td", v)));
      table.appendChild(row);
    });
    box.appendChild(table);
  }
  box.appendChild(el("p", "responses: " + Object.keys(op.responses || {}).join(", "), "muted"));
  box.appendChild(el("pre", curl(method, path, fields)));
  return box;
}

async function render() {
  const main = document.getElementById("api");
  try {
    const spec = await (await fetch("/openapi.json")).json();
    main.textContent = "";
    main.appendChild(el("p", `${spec.info.title} ${spec.info.version}: ${spec.info.description || ""}`));
    Object.entries(spec.paths).forEach(([path, ops]) => {
      Object.entries(ops).forEach(([method, op]) => main.appendChild(endpoint(spec, path, method, op)));
    });
  } catch (err) {
    main.textContent = `cannot load /openapi.json: ${err}`;
  }
}

render();
