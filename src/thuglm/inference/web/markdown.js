// A small Markdown renderer for the model's answers: fenced code, inline code, headings, lists, bold, italic.
// Safety comes first: every piece of the model's text is HTML-escaped before any tag is added, and the only tags
// added are the fixed ones below (no links, no images, no raw HTML), so an answer like
// `<img src=x onerror=alert(1)>` shows as that text. An unclosed fence (an answer still streaming) renders as code.
"use strict";

function escapeHtml(text) {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
             .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

function renderInline(text) {
  // Code spans first, so that * and _ inside them stay literal.
  return escapeHtml(text).split(/(`[^`]+`)/).map((part) => {
    if (part.length > 2 && part.startsWith("`") && part.endsWith("`")) return "<code>" + part.slice(1, -1) + "</code>";
    return part.replace(/\*\*(.+?)\*\*/g, "<strong>$1</strong>")
               .replace(/(^|[^*])\*([^*\s][^*]*?)\*(?!\*)/g, "$1<em>$2</em>");
  }).join("");
}

function renderMarkdown(text) {
  const lines = text.split("\n");
  const html = [];
  let paragraph = [];
  let list = null;  // "ul" or "ol" while inside a list
  const flushParagraph = () => {
    if (paragraph.length) html.push("<p>" + paragraph.map(renderInline).join("<br>") + "</p>");
    paragraph = [];
  };
  const closeList = () => { if (list) { html.push("</" + list + ">"); list = null; } };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+-]*)/);
    if (fence) {
      flushParagraph(); closeList();
      const code = [];
      for (i++; i < lines.length && !/^\s*```/.test(lines[i]); i++) code.push(lines[i]);
      const language = fence[1] ? ' data-language="' + escapeHtml(fence[1]) + '"' : "";
      html.push("<pre><code" + language + ">" + escapeHtml(code.join("\n")) + "</code></pre>");
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
    const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
    if (heading) {
      flushParagraph(); closeList();
      const level = Math.min(heading[1].length + 2, 6);  // answers' headings sit below the page's own
      html.push("<h" + level + ">" + renderInline(heading[2]) + "</h" + level + ">");
    } else if (bullet || numbered) {
      flushParagraph();
      const kind = bullet ? "ul" : "ol";
      if (list !== kind) { closeList(); html.push("<" + kind + ">"); list = kind; }
      html.push("<li>" + renderInline((bullet || numbered)[1]) + "</li>");
    } else if (!line.trim()) {
      flushParagraph(); closeList();
    } else {
      closeList();
      paragraph.push(line);
    }
  }
  flushParagraph(); closeList();
  return html.join("");
}
