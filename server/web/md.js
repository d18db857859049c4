// A small Markdown renderer for model answers: fenced code blocks (with a copy button),
// inline code, bold, italics, headings, lists, block quotes, http(s) links, paragraphs.
// Safe by construction: all text is HTML-escaped first; only the tags made here exist.
"use strict";

(function () {
  const escape = (s) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;").replace(/'/g, "&#39;");

  function inline(text) {
    // code spans first, kept out of the other rules by placeholders
    const spans = [];
    let s = text.replace(/`([^`\n]+)`/g, (_, code) => {
      spans.push("<code>" + escape(code) + "</code>");
      return "\u0000" + (spans.length - 1) + "\u0000";
    });
    s = escape(s);
    s = s.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
      (_, label, url) => `<a href="${url}" target="_blank" rel="noopener noreferrer">${label}</a>`);
    s = s.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
    s = s.replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>");
    s = s.replace(/(^|[^_\w])_([^_\n]+)_(?!\w)/g, "$1<em>$2</em>");
    return s.replace(/\u0000(\d+)\u0000/g, (_, i) => spans[Number(i)]);
  }

  function codeBlock(lang, lines) {
    const label = lang ? `<span class="lang">${escape(lang)}</span>` : "";
    return `<div class="code">${label}<button type="button" class="copy">Copy</button>` +
      `<pre><code>${escape(lines.join("\n"))}</code></pre></div>`;
  }

  function render(src) {
    const lines = src.replace(/\r\n?/g, "\n").split("\n");
    const out = [];
    let para = [], list = null;
    const flushPara = () => { if (para.length) { out.push("<p>" + para.map(inline).join("<br>") + "</p>"); para = []; } };
    const flushList = () => { if (list) { out.push(`<${list.tag}>` + list.items.map((i) => "<li>" + inline(i) + "</li>").join("") + `</${list.tag}>`); list = null; } };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*```\s*([\w+#.-]*)\s*$/);
      if (fence) {  // an unclosed fence (still streaming) runs to the end
        flushPara(); flushList();
        const body = [];
        for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) body.push(lines[i]);
        out.push(codeBlock(fence[1], body));
        continue;
      }
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
      const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
      const quote = line.match(/^>\s?(.*)$/);
      if (heading) {
        flushPara(); flushList();
        const n = heading[1].length;
        out.push(`<h${n + 2 > 6 ? 6 : n + 2}>${inline(heading[2])}</h${n + 2 > 6 ? 6 : n + 2}>`);
      } else if (bullet || numbered) {
        flushPara();
        const tag = bullet ? "ul" : "ol";
        if (!list || list.tag !== tag) { flushList(); list = { tag, items: [] }; }
        list.items.push((bullet || numbered)[1]);
      } else if (quote) {
        flushPara(); flushList();
        out.push("<blockquote>" + inline(quote[1]) + "</blockquote>");
      } else if (!line.trim()) {
        flushPara(); flushList();
      } else {
        flushList();
        para.push(line);
      }
    }
    flushPara(); flushList();
    return out.join("");
  }

  window.renderMarkdown = render;
})();
