// check-size.mjs — the size rules of the code base, run by `npm run lint`: no class in src/ over
// MAX_CLASS_LINES lines, no function over MAX_FUNCTION_LINES lines. A function's own lines exclude
// the functions nested in it (the handlers of a factory count on their own). Every line counts,
// comments and blank lines included, as `wc -l` would.
//
// Usage: node scripts/check-size.mjs [--list] [DIR …]   (default DIR: src; --list prints the 20 largest)
import { readFileSync } from 'node:fs';
import ts from 'typescript';
import { tsFilesUnder } from './ts-files.mjs';

const MAX_CLASS_LINES = 450;
const MAX_FUNCTION_LINES = 80;

/** Line numbers (0-based) spanned by the text [start, end). */
function codeLines(source, start, end) {
  const lines = new Set();
  if (end <= start) return lines;
  const first = source.getLineAndCharacterOfPosition(start).line;
  const last = source.getLineAndCharacterOfPosition(end - 1).line;
  for (let line = first; line <= last; line++) lines.add(line);
  return lines;
}

const isFunction = (node) => ts.isFunctionDeclaration(node) || ts.isMethodDeclaration(node) || ts.isArrowFunction(node)
  || ts.isFunctionExpression(node) || ts.isConstructorDeclaration(node) || ts.isGetAccessor(node) || ts.isSetAccessor(node);

function nameOf(node, source) {
  if (node.name !== undefined) return node.name.getText(source);
  if (ts.isConstructorDeclaration(node)) return 'constructor';
  const parent = node.parent;
  if (parent !== undefined && (ts.isVariableDeclaration(parent) || ts.isPropertyAssignment(parent) || ts.isPropertyDeclaration(parent))) return parent.name.getText(source);
  return '(anonymous)';
}

const findings = [];
const sizes = [];
const dirs = process.argv.slice(2).filter((a) => !a.startsWith('--'));
for (const file of (dirs.length > 0 ? dirs : ['src']).flatMap((d) => tsFilesUnder(d))) {
  const source = ts.createSourceFile(file, readFileSync(file, 'utf8'), ts.ScriptTarget.Latest, true);
  const visit = (node) => {
    if (ts.isClassDeclaration(node) || ts.isClassExpression(node)) {
      const count = codeLines(source, node.getStart(source), node.getEnd()).size;
      const where = `${file}:${source.getLineAndCharacterOfPosition(node.getStart(source)).line + 1}`;
      sizes.push({ count, what: `class ${node.name?.getText(source) ?? '(anonymous)'}`, where });
      if (count > MAX_CLASS_LINES) findings.push(`${where} class ${node.name?.getText(source) ?? ''} has ${count} lines (max ${MAX_CLASS_LINES})`);
    }
    if (isFunction(node) && node.body !== undefined) {
      const own = codeLines(source, node.getStart(source), node.getEnd());
      const removeNested = (child) => {
        if (isFunction(child) && child.body !== undefined && ts.isBlock(child.body)) {
          const body = child.body;
          const bodyStart = source.getLineAndCharacterOfPosition(body.getStart(source)).line;
          const bodyEnd = source.getLineAndCharacterOfPosition(body.getEnd() - 1).line;
          for (let line = bodyStart + 1; line < bodyEnd; line++) own.delete(line);
          return;
        }
        ts.forEachChild(child, removeNested);
      };
      ts.forEachChild(node.body, removeNested);
      const where = `${file}:${source.getLineAndCharacterOfPosition(node.getStart(source)).line + 1}`;
      sizes.push({ count: own.size, what: `function ${nameOf(node, source)}`, where });
      if (own.size > MAX_FUNCTION_LINES) findings.push(`${where} function ${nameOf(node, source)} has ${own.size} lines (max ${MAX_FUNCTION_LINES})`);
    }
    ts.forEachChild(node, visit);
  };
  visit(source);
}
if (process.argv.includes('--list')) {
  for (const { count, what, where } of sizes.sort((a, b) => b.count - a.count).slice(0, 20)) console.log(`${String(count).padStart(5)}  ${what}  ${where}`);
}
for (const finding of findings) console.error(finding);
process.exit(findings.length > 0 ? 1 : 0);
