// check-imports.mjs — the import rules of the code base, run by `npm run lint`:
//
// 1. Layers, each importing only from layers below it (type-only imports included):
//      io  <  qcow2/format  <  qcow2/engine  <  qcow2/check  <  qcow2/tools  <  node.ts (the Node wiring)
//          <  fuse, convert  <  cli  <  index.ts (the library API)
//    so io never reaches qcow2/fuse/cli, qcow2 never reaches fuse/cli/convert, fuse never reaches cli.
//    qcow2/format is pure: besides itself it may import only io/errors.ts (CodedError, the base of its
//    errors) — no I/O.
// 2. Nothing under src/qcow2 imports io/node-host-file.ts nor node:fs: qcow2 sees the HostFile
//    interface, and the opener is injected from above (src/node.ts).
// 3. No import cycle among the runtime imports of src/ — static imports, re-exports and dynamic
//    `await import()` alike (type-only imports vanish at run time and are not followed).
//
// Usage: node scripts/check-imports.mjs [ROOT]   (default ROOT: src)
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import ts from 'typescript';
import { tsFilesUnder } from './ts-files.mjs';

const root = resolve(process.argv[2] ?? 'src');

/** Layer of a file (path relative to ROOT, with '/'), and its rank: imports go to equal or lower ranks. */
const LAYERS = [
  ['io/', 'io', 1],
  ['qcow2/format/', 'qcow2/format', 2],
  ['qcow2/engine/', 'qcow2/engine', 3],
  ['qcow2/check/', 'qcow2/check', 4],
  ['qcow2/tools/', 'qcow2/tools', 5],
  ['node.ts', 'node wiring', 6],
  ['fuse/', 'fuse', 7],
  ['convert/', 'convert', 7],
  ['cli/', 'cli', 8],
  ['index.ts', 'library API', 9],
];
/** Imports format may make outside itself. */
const FORMAT_ALLOWED = new Set(['io/errors.ts']);

function layerOf(rel) {
  for (const [prefix, name, rank] of LAYERS) if (rel === prefix || rel.startsWith(prefix)) return { name, rank };
  return undefined;
}

/** The imports of `file`: { specifier, runtime, line }. */
function importsOf(file) {
  const text = readFileSync(file, 'utf8');
  const source = ts.createSourceFile(file, text, ts.ScriptTarget.Latest, true);
  const found = [];
  const add = (node, specifier, runtime) => {
    found.push({ specifier, runtime, line: source.getLineAndCharacterOfPosition(node.getStart(source)).line + 1 });
  };
  const visit = (node) => {
    if (ts.isImportDeclaration(node) && ts.isStringLiteral(node.moduleSpecifier)) {
      const clause = node.importClause;
      let typeOnly = clause?.isTypeOnly === true;
      if (!typeOnly && clause !== undefined && clause.name === undefined && clause.namedBindings !== undefined
        && ts.isNamedImports(clause.namedBindings) && clause.namedBindings.elements.length > 0) {
        typeOnly = clause.namedBindings.elements.every((e) => e.isTypeOnly);
      }
      add(node, node.moduleSpecifier.text, !typeOnly);
    } else if (ts.isExportDeclaration(node) && node.moduleSpecifier !== undefined && ts.isStringLiteral(node.moduleSpecifier)) {
      let typeOnly = node.isTypeOnly;
      if (!typeOnly && node.exportClause !== undefined && ts.isNamedExports(node.exportClause) && node.exportClause.elements.length > 0) {
        typeOnly = node.exportClause.elements.every((e) => e.isTypeOnly);
      }
      add(node, node.moduleSpecifier.text, !typeOnly);
    } else if (ts.isCallExpression(node) && node.expression.kind === ts.SyntaxKind.ImportKeyword) {
      const arg = node.arguments[0];
      if (arg !== undefined && ts.isStringLiteralLike(arg)) add(node, arg.text, true);
      else if (arg !== undefined && ts.isTemplateExpression(arg) && arg.head.text.startsWith('.') && arg.templateSpans.length === 1) {
        // `./commands/${name}.js`: every module of that directory the pattern can name.
        const head = arg.head.text;
        const tail = arg.templateSpans[0].literal.text.replace(/\.js$/, '.ts');
        const dir = resolve(dirname(file), head.slice(0, head.lastIndexOf('/') + 1));
        const prefix = head.slice(head.lastIndexOf('/') + 1);
        for (const name of existsSync(dir) ? readdirSync(dir) : []) {
          if (name.startsWith(prefix) && name.endsWith(tail) && !name.endsWith('.d.ts')) add(node, `./${relative(dirname(file), join(dir, name)).split('\\').join('/')}`, true);
        }
      } else add(node, '(computed)', true);
    }
    ts.forEachChild(node, visit);
  };
  visit(source);
  return found;
}

/** The .ts file a relative specifier names, or undefined (packages, node: builtins). */
function resolveSpecifier(from, specifier) {
  if (!specifier.startsWith('.')) return undefined;
  const target = resolve(dirname(from), specifier).replace(/\.js$/, '.ts');
  if (existsSync(target)) return target;
  if (existsSync(join(target, 'index.ts'))) return join(target, 'index.ts');
  return target;
}

const problems = [];
const graph = new Map();
const files = tsFilesUnder(root);
for (const file of files) {
  const rel = relative(root, file).split('\\').join('/');
  const layer = layerOf(rel);
  const edges = [];
  for (const imp of importsOf(file)) {
    const where = `${relative(process.cwd(), file)}:${imp.line}`;
    if (imp.specifier === '(computed)') {
      problems.push(`${where} dynamic import of a computed path (the import rules cannot follow it)`);
      continue;
    }
    if (rel.startsWith('qcow2/') && (imp.specifier === 'node:fs' || imp.specifier === 'fs' || imp.specifier.startsWith('node:fs/') || imp.specifier === 'fs/promises')) {
      problems.push(`${where} src/qcow2 imports ${imp.specifier} (it sees the HostFile interface only)`);
    }
    const target = resolveSpecifier(file, imp.specifier);
    if (target === undefined) continue;
    const targetRel = relative(root, target).split('\\').join('/');
    if (rel.startsWith('qcow2/') && targetRel === 'io/node-host-file.ts') {
      problems.push(`${where} src/qcow2 imports io/node-host-file (the opener is injected from above: src/node.ts)`);
    }
    const targetLayer = layerOf(targetRel);
    if (layer !== undefined && targetLayer !== undefined) {
      if (targetLayer.rank > layer.rank) {
        problems.push(`${where} upward import: ${layer.name} (${rel}) imports ${targetLayer.name} (${targetRel})`);
      } else if (layer.name === 'qcow2/format' && targetLayer.name !== 'qcow2/format' && !FORMAT_ALLOWED.has(targetRel)) {
        problems.push(`${where} qcow2/format is pure: ${rel} imports ${targetRel}`);
      }
    }
    if (imp.runtime) edges.push({ target, where });
  }
  graph.set(file, edges);
}

// Cycles: depth-first search over the runtime edges; each cycle is reported once, by its members.
const state = new Map();
const stack = [];
const seenCycles = new Set();
function dfs(file) {
  state.set(file, 'open');
  stack.push(file);
  for (const { target, where } of graph.get(file) ?? []) {
    if (!graph.has(target)) continue;
    if (state.get(target) === 'open') {
      const cycle = stack.slice(stack.indexOf(target)).map((f) => relative(root, f));
      const key = [...cycle].sort().join(' ');
      if (!seenCycles.has(key)) {
        seenCycles.add(key);
        problems.push(`${where} import cycle: ${[...cycle, relative(root, target)].join(' → ')}`);
      }
    } else if (!state.has(target)) {
      dfs(target);
    }
  }
  stack.pop();
  state.set(file, 'done');
}
for (const file of files) if (!state.has(file)) dfs(file);

for (const p of problems) process.stderr.write(`${p}\n`);
if (problems.length > 0) {
  process.stderr.write(`check-imports: ${problems.length} problem(s)\n`);
  process.exit(1);
}
